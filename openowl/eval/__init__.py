"""Evaluation: benchmarks as items (`tasks`), batched resumable answering (`runner`), scores (`metrics`,
`results`), OwlEval's report (`owleval`) and the lmms-eval adapter (`lmms_eval`). `openowl eval` drives them."""
