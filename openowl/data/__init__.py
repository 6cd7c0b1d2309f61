"""Data that several jobs share: dataset generators (`easy_vqa`) and the jsonl files of questions and answers
(`jsonl`)."""
