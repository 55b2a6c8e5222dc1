"""Built-in stages, one module each; importing a module registers its stage."""
