"""Numbers as the consoles write them (the charts' own formatting): ``{{ n|number }}`` with
thousands separators, ``{{ ratio|percent }}``, ``{{ ms|milliseconds }}``."""

from django import template

from dashboard import charts

register = template.Library()


@register.filter
def number(value):
    return charts.number(value)


@register.filter
def percent(value):
    return charts.percent(value)


@register.filter
def milliseconds(value):
    return charts.milliseconds(value)
