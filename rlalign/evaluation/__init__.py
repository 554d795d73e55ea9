"""Benchmarks of a trained model: POPE and CHAIR (object hallucination) and caption metrics, behind
`rlalign eval pope | chair | captions` (`runner.main_eval`)."""
