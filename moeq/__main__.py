from moeq.cli import app

app(prog_name="moeq")
