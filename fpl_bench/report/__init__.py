"""Reports over finished runs: the results schema, leaderboards, regression checks.

records.py      the columns of DIR/results.csv, reading (strict), upserting and writing them
sources.py      run stores: a results.csv folder or an MLflow tracking URI -> one records frame
leaderboard.py  records -> one row per (cell, metric): mean, std over seeds, status, paper number
paper.py        the DP-FPL paper's published numbers (leaderboards/paper-dpfpl.csv)
markdown.py     leaderboard -> Markdown tables (method x eps, best in bold, "ours (paper)")
plots.py        leaderboard -> PNG figures (accuracy vs eps; base vs novel; attack success
                vs eps where the runs were audited)
audits.py       a run folder's audit.csv (`fpl-bench audit`) joined to the records per cell:
                epsilon lower bound and membership-attack success beside each cell
html.py         one self-contained HTML page (inline CSS, plots as data URIs, no JavaScript)
build.py        write NAME.md, NAME.csv, NAME.html and NAME-plots/*.png into a folder
regression.py   a committed leaderboard CSV vs fresh runs: deltas, the rows that dropped,
                and the plan to rerun a baseline's cells
"""
