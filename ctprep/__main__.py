from ctprep.cli import app

app(prog_name="ctprep")
