"""Search by words: tags, full text, the ImageNet label bridge, CLIP, and match explanations."""
