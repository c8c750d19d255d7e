"""Study files, Ray stages, MLflow tracking and the `symzoo` command line."""
