"""Train, fine-tune and evaluate: recipes, the training loop and scoring."""
