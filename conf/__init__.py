"""w2w's Hydra configs, installed as the package w2w.conf."""
