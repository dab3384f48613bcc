"""The truncation experiment: a task the student visibly learns, its models, and (later) the runner.

`opd` is the recipe layer: nothing in the roles (actors/, cache/, learner/, protocol/) imports this.
"""
