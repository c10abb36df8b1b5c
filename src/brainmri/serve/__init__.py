"""Using a trained model: predictions from files, the web server and its page, micro-batching and the
audit trail. Imports every part below it; only the command line (`brainmri.cli`) stands above it."""
