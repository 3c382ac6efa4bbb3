def contrastive_loss(*a, **k): raise NotImplementedError
