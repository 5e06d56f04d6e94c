import geoopt_sgd


def test_every_public_name_imports_and_is_documented():
    for name in geoopt_sgd.__all__:
        obj = getattr(geoopt_sgd, name)
        if name == "__version__":
            assert isinstance(obj, str)
            continue
        assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"


def test_the_issues_names_import_from_the_top_level():
    # the public API the issues name, importable as `from geoopt_sgd import X`
    names = (
        "HessianOperator GGNOperator top_eigenpairs sharpness per_sample_gradients "
        "noise_geometry NoiseProbe ProbedSGD NoisyGD CyclicLRWrapper "
        "hutchinson_trace hutchpp_trace hutchinson_diagonal squared_frobenius "
        "spectral_density expected_sharpness METRICS DEFAULT_METRICS "
        "register_timm_optimizers"
    ).split()
    for name in names:
        assert name in geoopt_sgd.__all__, name
        assert getattr(geoopt_sgd, name) is not None
    assert set(geoopt_sgd.DEFAULT_METRICS) <= set(geoopt_sgd.METRICS)
