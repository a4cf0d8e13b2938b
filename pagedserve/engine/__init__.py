"""The engine: step loop, executors, detokenization, beam search, outputs, default model."""
