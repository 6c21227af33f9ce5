"""Checkpoints: their paths (`bios://`, `tinker://`), the on-disk layout with its one reader of a
saved state, and export for use outside Bios.

    paths.py    parsing and checking `bios://<run>/<kind>/<name>`; where a checkpoint's folder is
    layout.py   the files of a checkpoint folder; `read_state` / `write_state` of bios_state.json
    export.py   a checkpoint as a PEFT adapter folder or a merged Hugging Face model

Below the engine: the engine, the server, the recipes' run folders and `bios export` use it; it
uses only the model and type layers.
"""
