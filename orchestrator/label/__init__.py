"""People in the loop: `rlhf label serve|add-labeler|list|revoke|stats|export` (cli.py), the web
app (app.py, templates/, static/) and its tables in the run's comparison store (db.py)."""
