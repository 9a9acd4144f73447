"""Django admin form widgets with accessible names. The admin's split date/time widget renders
two inputs with one <label> between them (axe-core: "form elements must have labels"); these give
each input its own name. Used by every ModelAdmin with an editable date-time field."""

from django.contrib.admin.widgets import AdminSplitDateTime
from django.db import models


class LabelledSplitDateTime(AdminSplitDateTime):
    def get_context(self, name, value, attrs):
        context = super().get_context(name, value, attrs)
        date, time = context["widget"]["subwidgets"]
        date["attrs"]["aria-label"] = "date (YYYY-MM-DD)"
        time["attrs"]["aria-label"] = "time (HH:MM:SS, UTC)"
        return context


FORMFIELD_OVERRIDES = {models.DateTimeField: {"widget": LabelledSplitDateTime}}
