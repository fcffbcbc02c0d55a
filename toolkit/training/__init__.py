# Engine: builders that read the recipe, the Trainer loop and checkpoint files.
