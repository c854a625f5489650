"""Everything MLflow: the only package that imports it. Modules, each importing only those before it: ``env``
(defaults, store URIs, artifact roots, provenance), ``pyfunc`` (the served model), ``registry`` (log, register,
resolve ``models:/``, list / show / promote / download), ``runs`` (a training run), ``sweeps`` (a sweep's parent and
child runs). Importing the package imports none of them (and so no mlflow)."""
