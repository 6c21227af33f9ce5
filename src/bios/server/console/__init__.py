"""The web console of `bios serve` (at `/console`) and of `bios console` (local run folders).

`app.py` is the web application (pages, their JSON, login and CSRF rules from `access.py`);
`sources.py` what it shows from the server's records; `playground.py` its sampling;
`archive.py` checkpoint downloads. Templates and static files (uPlot 1.6.32, MIT, from npm,
its licence beside it) ship with the package: no build step.
"""
