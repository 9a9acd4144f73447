"""Numbers as the consoles write them (the charts' own formatting): ``{{ n|number }}`` with
thousands separators, ``{{ ratio|percent }}``, ``{{ ms|milliseconds }}``, ``{{ decimal|money }}``
(an amount of the currency: thousands separators, two decimals, more under a cent) and
``{{ decimal|exact }}`` (every digit it has, without trailing zeros)."""

from django import template

from config import money as money_
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


@register.filter
def money(value):
    return charts.amount(value)


@register.filter
def exact(value):
    return "–" if value is None else money_.plain(value)
