def sample_hard_negatives(*a, **k): raise NotImplementedError
