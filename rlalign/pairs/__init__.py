"""RE-ALIGN preference pairs: the builder (`rlalign pairs build`), its resumable store and its report.

`rlalign.pairs.builder` builds pairs over an image pool (embedded and indexed by `rlalign.retrieval`),
`rlalign.pairs.store` makes a pairs folder resumable (manifest and shard records), and
`rlalign.pairs.report` measures and draws a pair dataset.
"""
