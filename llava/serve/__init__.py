"""Talking to a model with token dropping switched on: LLaVA's chat in the terminal (`python -m llava.serve.cli`)
and a web page that answers with several methods side by side (`python -m llava.serve.web`).

- `cli`: LLaVA's chat command, its flags and the terminal loop (read, stream, statistics line).
- `chat`: one conversation about one image, each turn prompted with the whole conversation so far.
- `image_source`: the chat's image from a local path or an http(s) URL.
- `stats_line`: an answer's statistics as the one line the chat prints after it.
- `web`: the web page's command, its flags and their checks before the model loads.
- `page`: the page itself (Gradio): the form, one column per method, errors as the CLIs word them.
- `page_methods`: the methods a request runs, from the form's choices, budget and thresholds.
- `side_by_side`: one question answered by each method with the one shared model, and what each kept.
- `result_card`: an answer's statistics as the Markdown under it: tokens per stage and layer, FLOPs, times.
- `kept_pictures`: `llava.viz`'s pictures of each stage, rendered as images for the page.
"""
