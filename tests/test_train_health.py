"""Run health: which steps count as a blow-up against the running baseline, and which checkpoint is from before."""

import math

from deepmoe.train.health import describe_blowup, last_sound_step, new_health, observe


def run(steps):
    """Feed (loss, grad_norm) pairs as steps 1, 2, ...; → the health after each."""
    health, out = new_health(), []
    for i, (loss, gn) in enumerate(steps, start=1):
        health = observe(health, i, loss, gn)
        out.append(health)
    return out


def test_a_falling_loss_with_steady_gradients_is_healthy():
    hs = run([(8.0, 3.0), (7.5, 2.5), (7.0, 4.0), (6.0, 1.0), (5.0, 2.0)])
    assert all(h["blowup"] is None for h in hs)
    assert last_sound_step(hs[-1]) is None
    assert hs[0]["loss_mean"] == 8.0 and hs[1]["loss_mean"] == 8.0 + 0.1 * (7.5 - 8.0)


def test_loss_spike_gradient_jump_and_non_finite_values_are_blowups():
    base = [(4.0, 2.0)] * 5
    for bad in [(6.5, 2.0), (4.0, 25.0), (4.0, 0.0), (math.nan, 2.0), (4.0, math.inf)]:
        h = run(base + [bad])[-1]
        assert h["blowup"] is not None and h["blowup"]["step"] == 6, bad
        assert last_sound_step(h) == 4  # step 6 measured the weights of checkpoint 5: that one holds the bad update
        assert (h["loss_mean"], h["grad_norm_mean"]) == (4.0, 2.0)  # the blow-up does not move the baseline
    ok = run(base + [(5.9, 19.0)])[-1]  # under 1.5x the loss and 10x the gradient norm: a bump, not a blow-up
    assert ok["blowup"] is None


def test_the_blowup_is_the_first_step_of_an_unbroken_run_and_a_healthy_step_ends_it():
    hs = run([(4.0, 2.0)] * 3 + [(9.0, 2.0), (math.nan, math.nan), (8.0, 0.0)])
    assert [h["blowup"] and h["blowup"]["step"] for h in hs] == [None, None, None, 4, 4, 4]
    assert describe_blowup(hs[-1]) == ("at step 4 (loss 9 against a running mean of 4, "
                                       "gradient norm 2 against a running mean of 2)")
    assert run([(4.0, 2.0)] * 3 + [(9.0, 2.0), (4.1, 2.0)])[-1]["blowup"] is None
    nan = run([(4.0, 2.0), (4.0, math.nan)])[-1]
    assert "gradient norm non-finite" in describe_blowup(nan)
