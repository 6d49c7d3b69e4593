"""The one request path every face runs on (pipeline), and what every request needs: answer events, errors, observation, metrics, auth, SSE."""
