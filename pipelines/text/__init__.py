"""The transformers side: sequence classifiers, text data, the PEFT adapter folder, the learning-rate sweep."""
