"""Talking to a model with token dropping switched on: LLaVA's chat in the terminal (`python -m llava.serve.cli`).

- `cli`: LLaVA's chat command, its flags and the terminal loop (read, stream, statistics line).
- `chat`: one conversation about one image, each turn prompted with the whole conversation so far.
- `image_source`: the chat's image from a local path or an http(s) URL.
- `stats_line`: an answer's statistics as the one line the chat prints after it.
"""
