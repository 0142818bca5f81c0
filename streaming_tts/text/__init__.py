"""Text processing: incremental phrase splitting and phonemization to Piper ids."""
