"""Preference data: read rows (dataset), tokenize + truncate in NxDT's order (tokenize), cache the
tokens (cache), and collate pairs into [2B, T] batches (batches). The tiny default lives in tiny."""
