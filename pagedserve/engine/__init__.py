"""The in-process engine: step loop, detokenization, beam search, outputs, default model."""
