"""`med2e3-serve`: a local web viewer over a Med-2E3 model (Gradio).

    scans.py    a CT as the viewer holds it: the model's input and an HU copy on the model's slices; the
                three planes under a window preset; the embedded phantoms and real CTs
    uploads.py  the private upload folder: size bound, DICOM `.zip` extraction, removal after reading
    engine.py   the model behind the page: encode, prefill and greedy decode compiled once, answers
                streamed token by token with their slice scores and latencies
    page.py     the page's HTML fragments: one bar per slice and question, the answers side by side
    viewer.py   the handlers (plain Python: what each event of the page does), tested without a browser
    app.py      the Gradio layout wiring the handlers to the page, and the server's launch

The command line is `med2e3_jax/cli/serve.py`; the page is described in docs/serve.md.
"""
