"""The dashboard's views, one module a page family; thin: rules live in ``accounts`` and
``inference`` services and selectors, tenant scoping in ``accounts.dashboard``."""
