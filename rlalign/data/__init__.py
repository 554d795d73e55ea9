"""rlalign.data"""
