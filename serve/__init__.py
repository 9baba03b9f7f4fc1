"""serve: frontend, router and worker(s) in one process (`python -m dynamo.serve`). The one
package that imports frontend, router and workers together; nothing imports it."""
