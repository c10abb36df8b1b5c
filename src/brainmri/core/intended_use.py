"""What the model is for, stated once: the web page, every API and CLI result
and the model card all carry this sentence."""

NOT_A_MEDICAL_DEVICE = "Research software, not a medical device: not for diagnosis or treatment decisions."
