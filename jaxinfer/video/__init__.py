"""Text-to-video: flow-matching samplers, the CFG denoising pipeline, step caching, video files."""
