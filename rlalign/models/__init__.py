"""rlalign.models"""
