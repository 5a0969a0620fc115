"""metacenter-console: a terminal console that watches metacenter nodes over HTTP."""
