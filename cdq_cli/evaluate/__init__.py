"""Model quality metrics: perplexity (GPTQ protocol) and image-classification top-1/top-5."""
