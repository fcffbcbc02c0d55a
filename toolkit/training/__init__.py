# Training: builders that read the recipe, the Trainer loop and its parts (checkpoints: toolkit/checkpoint).
