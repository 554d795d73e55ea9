"""rlalign.trainer"""
