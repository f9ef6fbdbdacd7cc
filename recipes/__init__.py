"""The recipes, shipped inside the package as ``actvar_cli.recipe_files`` (pyproject.toml maps this folder)."""
