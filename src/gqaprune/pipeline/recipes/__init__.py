"""One module per pipeline stage, each with ``run(params, out, ctx)``: the stage's body."""
