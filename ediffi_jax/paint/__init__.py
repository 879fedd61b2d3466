"""Paint-with-words: phrase masks that bias cross-attention, and the inputs that make them."""
