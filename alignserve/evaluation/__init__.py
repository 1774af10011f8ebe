"""The evaluation harness (`alignserve eval`): task sets with their metrics (tasks, metrics),
strategy configurations (strategies), a client that drives a live server through the official
openai client (runner), and the report: JSON, Markdown and an SVG plot (report).

It is a client of the server: it imports nothing from `server`, `decoding` or `engine`.
"""
