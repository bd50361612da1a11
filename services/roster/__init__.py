"""The roster service (实名制): people, their slots, and the enrol/transfer/release sagas."""
