"""Evaluation harness: the local OpenAI-compatible replay server and recorded cases."""
