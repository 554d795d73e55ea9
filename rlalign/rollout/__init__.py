"""rlalign.rollout"""
