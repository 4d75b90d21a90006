"""The Images API and the editor over a trained stack: `python -m unclip.serve --stack runs/demo`.

A thin HTTP layer over unclip.pipeline, as the command line is (DESIGN.md): the routes parse and
check a request (app.py, inputs.py), one worker thread owns the models and runs what the bounded
queue hands it, batching compatible generations (worker.py), and errors leave in OpenAI's shape
(errors.py). The editor is static files in static/, talking to the same API.

Needs the serve extra: pip install -e '.[serve]' (FastAPI, uvicorn, python-multipart).
"""
