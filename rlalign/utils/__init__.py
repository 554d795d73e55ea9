"""Small shared helpers with no rlalign imports: atomic file writes, device moves."""
