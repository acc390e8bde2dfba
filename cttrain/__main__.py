from cttrain.cli import app

app(prog_name="cttrain")
