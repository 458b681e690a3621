"""Judge generative LoRA checkpoints: metrics per sample image, a weighted composite with confidence
intervals, copy detection and a leaderboard (issue 13; see docs/judge.md)."""
